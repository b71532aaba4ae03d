from pacs_node.cli import app

app()
