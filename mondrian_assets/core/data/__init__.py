"""Reading the app's jobs and files, linking them, and the train/val splits."""
