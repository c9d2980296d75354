from remote_exec.cli import main

main()
