"""The paint job (VisCPM-Paint over prompt lists): `config`, `schema` (every paint column name), `prompts` (prompt
files, seeds, keys), `stage` (the paint actor and its model loading), `job` (wiring, run), `report` (the contact
sheet)."""
