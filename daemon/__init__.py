"""trainerd: the continuous fine-tuning daemon (queue, watcher, control, status)."""
