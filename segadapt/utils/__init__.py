"""The lowest layer: file writing, checkpoint-file helpers and process-group helpers that
every other layer may use; nothing here knows of data, models or methods."""
