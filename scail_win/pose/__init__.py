"""`scail-win pose`: SCAIL-Pose's driving video -> rendered pose video, without its second environment."""
