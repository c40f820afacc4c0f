from fractured.cli import main

main()
