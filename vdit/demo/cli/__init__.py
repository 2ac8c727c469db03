"""The demo's command-line tools: ``vdit-train`` (:mod:`.train`), ``vdit-generate`` (:mod:`.generate`) and
``vdit-eval-demo`` (:mod:`.eval`); what they share is in :mod:`.common`."""
