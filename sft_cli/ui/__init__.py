"""What the user watches: progress bars and plots."""
