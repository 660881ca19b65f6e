"""rcd's Hydra sweeper plugin (``hydra/sweeper=rcd_list``); see :mod:`.list_sweeper`."""
