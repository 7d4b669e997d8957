# The server workload (busybox sh): a statically linked server (busybox httpd) starts, answers one
# request over the container's own loopback, and the answer is printed.
busybox httpd -f -p 127.0.0.1:18080 -h /usr/share/doc/python3.11/html &
server=$!
tries=0
until page=$(busybox wget -q -O - http://127.0.0.1:18080/library/functions.html 2>/dev/null); do
    tries=$((tries + 1))
    if [ "$tries" -ge 500 ]; then
        kill "$server"
        echo "the server never answered" >&2
        exit 1
    fi
    busybox usleep 10000
done
kill "$server"
echo "hello from server: functions.html, $(echo "$page" | busybox grep -c href) links, ${#page} bytes"
