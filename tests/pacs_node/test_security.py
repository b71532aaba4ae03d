"""DICOM TLS on the listener and for exports; calling-AE allow list through the whole node."""

from __future__ import annotations

import pytest
from nodetest_helpers import echoscu, make_pki, make_study
from pydicom import dcmread

from pacs_node.config import Destination, ExportConfig, ListenerConfig, TlsConfig
from pacs_node.export import (
    EchoError,
    PermanentExportError,
    echo_peer,
    send_dimse,
    send_with_retries,
)
from pacs_node.listener import Listener

pytestmark = pytest.mark.peers


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def _tls_listener(store, pki, require_client_cert):
    spool, index, ingest = store
    tls = TlsConfig(enabled=True, cert=pki.server_cert, key=pki.server_key, ca=pki.ca,
                    require_client_cert=require_client_cert)
    lst = Listener(ListenerConfig(host="127.0.0.1", port=0, tls=tls), ingest)
    lst.start()
    return lst


def test_tls_listener_refuses_plaintext_and_accepts_tls_clients(store, pki):
    lst = _tls_listener(store, pki, require_client_cert=False)
    try:
        assert echoscu(lst.port, extra=["-to", "5"]).returncode != 0  # plaintext refused
        with pytest.raises(EchoError):
            echo_peer(f"IGTV@127.0.0.1:{lst.port}", timeout=5)
        # dcmtk over TLS, verifying the server against the CA
        res = echoscu(lst.port, extra=["+tls", str(pki.client_key), str(pki.client_cert), "+cf", str(pki.ca)])
        assert res.returncode == 0, res.stdout + res.stderr
        # pynetdicom over TLS without a client certificate (not required here)
        assert echo_peer(f"IGTV@127.0.0.1:{lst.port}", timeout=5, tls=TlsConfig(ca=pki.ca), use_tls=True) > 0
    finally:
        lst.stop()


def test_tls_client_certificate_required(store, pki, tmp_path):
    lst = _tls_listener(store, pki, require_client_cert=True)
    try:
        with pytest.raises(EchoError):
            echo_peer(f"IGTV@127.0.0.1:{lst.port}", timeout=5, tls=TlsConfig(ca=pki.ca), use_tls=True)
        other = make_pki(tmp_path / "other")  # a certificate from a CA the node does not trust
        with pytest.raises(EchoError):
            echo_peer(f"IGTV@127.0.0.1:{lst.port}", timeout=5,
                      tls=TlsConfig(ca=pki.ca, cert=other.client_cert, key=other.client_key), use_tls=True)
        good = TlsConfig(ca=pki.ca, cert=pki.client_cert, key=pki.client_key)
        assert echo_peer(f"IGTV@127.0.0.1:{lst.port}", timeout=5, tls=good, use_tls=True) > 0
        # an export over TLS with a client certificate lands in the spool
        study = make_study(tmp_path / "s", n_ct=2, n_pet=1)
        dest = Destination(name="tls", kind="dimse", ae_title="IGTV", host="127.0.0.1", port=lst.port, tls=True)
        sent = send_dimse(dest, study.files, "IGTV", timeout=10, tls=good)
        stored = {dcmread(p).SOPInstanceUID for p in lst.ingest.spool.study_files(study.study_uid)}
        assert stored == set(sent) and len(sent) == 3
    finally:
        lst.stop()


def test_tls_export_to_an_untrusted_certificate_is_permanent_and_names_it(store, pki, tmp_path):
    lst = _tls_listener(store, pki, require_client_cert=False)
    other = make_pki(tmp_path / "other")  # the node trusts another CA than the one that signed the peer
    dest = Destination(name="tls", kind="dimse", ae_title="IGTV", host="127.0.0.1", port=lst.port, tls=True)
    cfg = ExportConfig(max_attempts=3, backoff_initial_s=0.01, tls=TlsConfig(ca=other.ca))
    sleeps = []
    try:
        study = make_study(tmp_path / "s", n_ct=1, n_pet=0)
        with pytest.raises(PermanentExportError, match="certificate check failed.*export.tls.ca"):
            send_with_retries(dest, study.files, cfg, "IGTV", sleep=sleeps.append)
        assert sleeps == []  # not retried
        assert lst.ingest.spool.study_files(study.study_uid) == []
    finally:
        lst.stop()


def test_tls_contexts_require_tls12(pki):
    import ssl

    from pacs_node.tls import client_context, server_context

    server = server_context(TlsConfig(enabled=True, cert=pki.server_cert, key=pki.server_key, ca=pki.ca,
                                      require_client_cert=True))
    assert server.minimum_version == ssl.TLSVersion.TLSv1_2
    assert server.verify_mode == ssl.CERT_REQUIRED
    client = client_context(TlsConfig(ca=pki.ca))
    assert client.minimum_version == ssl.TLSVersion.TLSv1_2
    assert client.verify_mode == ssl.CERT_REQUIRED and client.check_hostname
