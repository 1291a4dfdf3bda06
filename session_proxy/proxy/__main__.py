from session_proxy.proxy.app import main

main()
