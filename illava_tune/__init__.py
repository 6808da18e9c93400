"""illava-tune: the command line and service layer over `illava` (which never imports this)."""
