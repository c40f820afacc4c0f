from fractured.cli import main

if __name__ == "__main__":  # not when a spawned child (daemon.decoding) imports it
    main()
