from ddpmkit.commands import main

main()
