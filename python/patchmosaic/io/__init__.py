"""patchmosaic.io: what the package writes and shows: resumable state files and atomic writes
(runstate.py), PNG pictures (png.py, plots.py) and progress bars (progress.py)."""
