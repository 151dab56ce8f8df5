"""The archive stage: appends the records of the archived topics to the archive on disk (DESIGN A11)."""
