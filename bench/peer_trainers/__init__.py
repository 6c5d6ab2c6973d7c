"""Adapters between draftsmith and other projects' drafter trainers, for bench/peers.py: our records and target in
each peer's input format, each peer run in its own locked environment (bench/peer_trainers/setup), and its
checkpoints read back (models.eagle3_export.read_folder). The peers' code is installed, never copied here."""
