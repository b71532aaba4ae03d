-- route-to-igtv.lua: send stable PET/CT studies from Orthanc to igtv-node.
--
-- When a study becomes stable (no new instance for "StableAge" seconds), this
-- script looks at its series and, if the study holds at least one CT and one
-- attenuation-corrected PET series, sends those series (and only those) to the
-- DICOM modality named IGTV_MODALITY in orthanc.json. The node answers later
-- with a DICOM-SEG and an RTSTRUCT in the same study.
--
-- The results arriving make the study unstable and then stable again; to avoid
-- a loop the script remembers, in the study's user metadata "IgtvRouted", which
-- CT/PET series (and how many instances of each) it has sent, and sends again
-- only when that set changed (late or replaced images), which makes the node
-- re-run the study; the node's results keep their UIDs, so a re-run replaces.
-- Orthanc needs "UserMetadata": { "IgtvRouted": 1024 } for this (see orthanc.json).

IGTV_MODALITY = 'igtv'      -- key of the node in orthanc.json "DicomModalities"
IGTV_METADATA = 'IgtvRouted'

-- First instance of a series, or nil.
local function FirstInstance(seriesId)
   local instances = ParseJson(RestApiGet('/series/' .. seriesId .. '/instances'))
   if instances == nil or #instances == 0 then
      return nil
   end
   return instances[1]
end

-- Value of a tag ("0028,0051") of an instance as a string, '' if absent.
local function InstanceTag(instanceId, tag)
   local tags = ParseJson(RestApiGet('/instances/' .. instanceId .. '/tags?short'))
   local value = tags[tag]
   if value == nil then
      return ''
   end
   return tostring(value)
end

-- The series of a study the node needs: CT (no localizers) and attenuation-corrected PT.
-- A PT series counts as attenuation-corrected when CorrectedImage (0028,0051) holds ATTN;
-- if no PT series says so, every PT series is sent and the node picks.
local function SeriesToRoute(studyId)
   local ct, ptAc, ptAll = {}, {}, {}
   for _, series in pairs(ParseJson(RestApiGet('/studies/' .. studyId .. '/series'))) do
      local modality = series['MainDicomTags']['Modality']
      local first = series['Instances'][1]
      if modality == 'CT' and first ~= nil then
         local imageType = string.upper(InstanceTag(first, '0008,0008'))
         if string.find(imageType, 'LOCALIZER', 1, true) == nil then
            table.insert(ct, series)
         end
      elseif modality == 'PT' and first ~= nil then
         table.insert(ptAll, series)
         local corrected = string.upper(InstanceTag(first, '0028,0051'))
         if string.find(corrected, 'ATTN', 1, true) ~= nil then
            table.insert(ptAc, series)
         end
      end
   end
   local pt = ptAc
   if #pt == 0 then
      pt = ptAll
   end
   if #ct == 0 or #pt == 0 then
      return nil
   end
   local chosen = {}
   for _, s in ipairs(ct) do table.insert(chosen, s) end
   for _, s in ipairs(pt) do table.insert(chosen, s) end
   return chosen
end

-- A string naming the routed series and their instance counts, in a stable order.
local function Signature(series)
   local parts = {}
   for _, s in ipairs(series) do
      table.insert(parts, s['ID'] .. ':' .. tostring(#s['Instances']))
   end
   table.sort(parts)
   return table.concat(parts, ',')
end

function OnStableStudy(studyId, tags, metadata)
   local series = SeriesToRoute(studyId)
   if series == nil then
      print('igtv: study ' .. studyId .. ' has no CT + PET pair, not routed')
      return
   end
   local signature = Signature(series)
   local previous = ''
   if metadata ~= nil and metadata[IGTV_METADATA] ~= nil then
      previous = metadata[IGTV_METADATA]
   end
   if previous == signature then
      return  -- already sent exactly these images (e.g. the node's results just arrived)
   end
   local ids = {}
   for _, s in ipairs(series) do
      table.insert(ids, s['ID'])
   end
   print('igtv: routing study ' .. studyId .. ' (' .. #ids .. ' series) to ' .. IGTV_MODALITY)
   RestApiPost('/modalities/' .. IGTV_MODALITY .. '/store',
               DumpJson({ Resources = ids, Asynchronous = true }, true))
   RestApiPut('/studies/' .. studyId .. '/metadata/' .. IGTV_METADATA, signature)
end
