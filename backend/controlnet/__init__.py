"""ControlNet as the app sees it (no torch): model files and their families, units parsed from requests, the
service that lists them and queues detect jobs (sd-webui-controlnet compatible). The preprocessor names are
`backend.core.preprocessor_catalog`; loading, annotators and applying units are `backend.engine.controlnet`."""
