"""`dmdr eval`: score the checkpoints of a run (CLIP, HPSv2.1, FID) against their step."""
