"""The application: the `freezeflow` CLI (cli), the pipeline's steps that the CLI, DVC stages and Prefect
tasks share (steps), terminal progress (progress), and bundled sample data (sample_data, photosets)."""
