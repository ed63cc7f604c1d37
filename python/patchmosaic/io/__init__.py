"""patchmosaic.io: what the package writes and shows: atomic writes (files.py), resumable state files
(runstate.py), PNG pictures of images (images.py, Pillow), figures (plots.py, matplotlib) and progress bars
(progress.py, tqdm)."""
