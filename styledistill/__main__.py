from styledistill.cli import app

app()
