"""Operations that need both the daemon and the trainer: the trainer-ctl CLI, consolidation,
snapshots, init-base, check, generate. Nothing below (core/, daemon/, trainer/, monitor/)
imports this package.
"""
