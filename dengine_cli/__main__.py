from dengine_cli.cli import main

main()
