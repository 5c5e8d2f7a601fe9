"""What each command does, as plain functions the CLI calls: train and evaluate, plan, check, sweep, prepare, runs, predict, chat, serve, export, the model card and starter recipes."""
