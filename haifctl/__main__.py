from haifctl.cli import main

main()
