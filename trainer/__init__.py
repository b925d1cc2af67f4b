"""The trainer side: the Trainer interface the daemon drives, and its implementations."""
