from fmchat.cli import main

main()
