// The JVM workload: classes from several jars (random access inside each zip), one line out.
import com.fasterxml.jackson.databind.ObjectMapper;
import com.google.common.base.Joiner;
import com.google.common.collect.ImmutableSortedMap;
import com.google.common.hash.Hashing;
import java.nio.charset.StandardCharsets;
import java.util.Map;
import org.apache.commons.lang3.StringUtils;
import org.apache.commons.text.WordUtils;

public class Hello {
    public static void main(String[] args) throws Exception {
        Map<String, Object> doc = ImmutableSortedMap.of(
                "java", System.getProperty("java.version"),
                "title", WordUtils.capitalize("lazy pulling of a jvm image"),
                "hash", Hashing.sha256().hashString("stargz", StandardCharsets.UTF_8).toString().substring(0, 12),
                "joined", Joiner.on('-').join(StringUtils.split("a b c")));
        System.out.println("hello from java " + new ObjectMapper().writeValueAsString(doc));
    }
}
