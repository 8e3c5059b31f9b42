"""HTTP routes: jobs, models, datasets, health."""
