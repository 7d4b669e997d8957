# The shell workload (dash): coreutils, grep, sed, gawk and find in pipelines over a word list.
set -e
words=/usr/share/dict/american-english
n=$(tr 'A-Z' 'a-z' < $words | sort -u | wc -l)
top=$(cut -c1 $words | tr 'A-Z' 'a-z' | sort | uniq -c | sort -rn | head -n 1 | gawk '{ print $2 }')
longest=$(gawk 'length > m { m = length; w = $0 } END { print w }' $words)
possessive=$(grep -c "'s\$" $words)
zed=$(sed -n '/^[zZ]/p' $words | wc -l)
copyrights=$(find /usr/share/doc -name copyright | wc -l)
digest=$(sha256sum < $words | cut -c1-12)
printf 'hello from shell: %s words, most start with %s, longest %s, %s possessive, %s with z, %s copyright files, %s\n' \
    "$n" "$top" "$longest" "$possessive" "$zed" "$copyrights" "$digest"
