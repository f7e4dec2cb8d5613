"""The review desk: a web page over the lake (runs and their reports, batches and their drift, the
review queue) that writes reviewers' decisions back as feedback labels.

* :mod:`zalando.ui.store` — every lake read and write of the page (the one module to change when the
  tables move);
* :mod:`zalando.ui.app` — the FastAPI app (``create_app``); :mod:`zalando.ui.security` — its guards;
* :mod:`zalando.ui.render` — HTML, SVG and PNG of the pages; :mod:`zalando.ui.links` — their URLs
  (``ui_links`` for Prefect artifacts); :mod:`zalando.ui.settings` — ``ZALANDO_UI_*``.

Nothing is imported or started here: ``zalando ui`` builds the app and runs it with uvicorn.
"""
