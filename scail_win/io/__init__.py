"""Job inputs and outputs: video and image files, job folders, resume state, embedding cache."""
