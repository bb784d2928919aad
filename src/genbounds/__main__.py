from genbounds.cli import main

main()
