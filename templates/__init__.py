"""The report's Jinja templates, stylesheets and browser script: package data, read through
`importlib.resources` (`xaudit.tasks.report.TEMPLATES`), so an installed wheel renders reports too."""
