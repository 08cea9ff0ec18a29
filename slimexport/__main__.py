from slimexport.cli import main

main()
