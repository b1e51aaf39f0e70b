from dengine_cli.entry import main

main()
