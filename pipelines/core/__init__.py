"""What both jobs share: column names and the stage contract (`columns`, `stage`), the model-actor base
(`model_stage`), model folders (`model_cache`), the job-config base with YAML/CLI/README generation (`config`),
input listing and id checks (`inputs`), local/S3 storage (`storage`), the output store and its write stage
(`output`), and the run skeleton (`runner`)."""
