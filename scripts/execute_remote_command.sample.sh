#!/bin/sh
# Drop-in for MInt's execute_remote_command.sample.sh / .py: a module's objectPath
# program keeps calling it with the old arguments
#   client_name:HOST client_cmd:CMD client_files:a,b,c
# and remote-exec does the work over one SSH connection.
exec remote-exec legacy "$@"
