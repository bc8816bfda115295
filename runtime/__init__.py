"""What commands and flows need from the process and the machine: environment, checks, servers, task runners."""
