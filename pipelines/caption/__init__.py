"""The caption job (VisCPM-Chat over an image corpus): `config`, `schema` (output columns), `readers` +
`webdataset` (inputs), `decode`, `stage` (the caption actor and its model loading), `job` (wiring, run)."""
