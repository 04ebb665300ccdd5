"""Reports as documents: blocks written once (`document`), rendered to Markdown for Git diffs and to one standalone
HTML file for MLflow (`render`), with PNG plots (`plots`). Stages and flows build their reports from these."""
