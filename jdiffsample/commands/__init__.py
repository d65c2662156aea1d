"""Sub-commands of the ``jdiffsample`` CLI (see ``jdiffsample.cli``)."""
