"""Running the gateway under supervisord: programs, the group-down listener, control."""
