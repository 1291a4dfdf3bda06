from session_proxy.manager.app import main

main()
