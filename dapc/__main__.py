from dapc.cli import main

main()
