// The JDBC part of the driver matrix (pgJDBC, Debian's libpostgresql-jdbc-java): every setter an
// application uses for each encrypted type, through prepared statements (server-side from the
// first execution), into the encrypted column and into a plain one; read back with decrypt()
// and compared with the plain column, and read as an envelope. Prints one line; exits 1 on the
// first difference.
//
//     java -cp /usr/share/java/postgresql.jar:. Matrix <host> <port> <database> <user>
import java.math.BigDecimal;
import java.sql.*;
import org.postgresql.util.PGobject;

public class Matrix {
    interface Setter { void set(PreparedStatement p, int i, int which) throws SQLException; }

    static int checks = 0;

    static void fail(String what) {
        System.out.println("JDBC: FAILED: " + what);
        System.exit(1);
    }

    static PGobject json(String text) throws SQLException {
        PGobject o = new PGobject();
        o.setType("jsonb");
        o.setValue(text);
        return o;
    }

    public static void main(String[] a) throws Exception {
        String url = "jdbc:postgresql://" + a[0] + ":" + a[1] + "/" + a[2] + "?user=" + a[3] + "&sslmode=require&prepareThreshold=1";
        Object[][] cases = {
            {"text", "setString", (Setter) (p, i, w) -> p.setString(i, w == 0 ? "héllo wörld" : "second")},
            {"text", "setObject", (Setter) (p, i, w) -> p.setObject(i, w == 0 ? "object text" : "other")},
            {"bytea", "setBytes", (Setter) (p, i, w) -> p.setBytes(i, w == 0 ? new byte[] {0, 1, (byte) 255} : new byte[] {(byte) 0xcc, (byte) 0xcc})},
            {"bytea", "setObject", (Setter) (p, i, w) -> p.setObject(i, w == 0 ? new byte[] {7} : new byte[] {})},
            {"jsonb", "setObject", (Setter) (p, i, w) -> p.setObject(i, json(w == 0 ? "{\"a\": [1, 2.5]}" : "{\"b\": null}"))},
            {"numeric", "setBigDecimal", (Setter) (p, i, w) -> p.setBigDecimal(i, new BigDecimal(w == 0 ? "12345.6789" : "-0.5"))},
            {"numeric", "setInt", (Setter) (p, i, w) -> p.setInt(i, w == 0 ? 7 : -7)},
            {"numeric", "setLong", (Setter) (p, i, w) -> p.setLong(i, w == 0 ? 1L << 40 : 3L)},
            {"numeric", "setDouble", (Setter) (p, i, w) -> p.setDouble(i, w == 0 ? 5.5 : 0.25)},
            {"numeric", "setObject", (Setter) (p, i, w) -> p.setObject(i, new BigDecimal(w == 0 ? "1.50" : "2"))},
            {"int8", "setLong", (Setter) (p, i, w) -> p.setLong(i, w == 0 ? 1L << 40 : -1L)},
            {"int8", "setInt", (Setter) (p, i, w) -> p.setInt(i, w == 0 ? 7 : 8)},
            {"int8", "setObject", (Setter) (p, i, w) -> p.setObject(i, Long.valueOf(w == 0 ? 5 : 6))},
            {"date", "setDate", (Setter) (p, i, w) -> p.setDate(i, Date.valueOf(w == 0 ? "2030-01-02" : "1999-12-31"))},
            {"date", "setObject", (Setter) (p, i, w) -> p.setObject(i, java.time.LocalDate.of(2030, 1, w == 0 ? 2 : 3))},
            {"timestamptz", "setTimestamp", (Setter) (p, i, w) -> p.setTimestamp(i, Timestamp.valueOf(w == 0 ? "2030-01-02 03:04:05.123" : "2001-02-03 04:05:06"))},
            {"timestamptz", "setObject", (Setter) (p, i, w) -> p.setObject(i, java.time.OffsetDateTime.parse(w == 0 ? "2030-01-02T03:04:05Z" : "2001-02-03T04:05:06+02:00"))},
        };
        try (Connection c = DriverManager.getConnection(url); Statement s = c.createStatement()) {
            s.execute("SET TimeZone = 'America/New_York'");
            int n = 0;
            for (Object[] k : cases) {
                String plain = (String) k[0], setter = (String) k[1];
                Setter set = (Setter) k[2];
                String p = "jd_p_" + n, e = "jd_e_" + n;
                n++;
                s.execute("DROP TABLE IF EXISTS " + p + ", " + e + "; CREATE TABLE " + p + " (id int PRIMARY KEY, v " + plain + "); CREATE TABLE " + e + " (id int PRIMARY KEY, v encrypted_" + plain + ")");
                for (String t : new String[] {p, e}) {
                    try (PreparedStatement ins = c.prepareStatement("INSERT INTO " + t + " VALUES (?, ?)");
                         PreparedStatement upd = c.prepareStatement("UPDATE " + t + " SET v = ? WHERE id = 2");
                         PreparedStatement ups = c.prepareStatement("INSERT INTO " + t + " VALUES (?, ?) ON CONFLICT (id) DO UPDATE SET v = EXCLUDED.v")) {
                        for (int id = 1; id <= 2; id++) {
                            ins.setInt(1, id);
                            set.set(ins, 2, 0);
                            ins.executeUpdate();
                        }
                        set.set(upd, 1, 1);
                        upd.executeUpdate();
                        ups.setInt(1, 1);
                        set.set(ups, 2, 1);
                        ups.executeUpdate();
                    } catch (SQLException x) {
                        fail(plain + " " + setter + " into " + t + ": " + x.getSQLState() + " " + x.getMessage());
                    }
                }
                for (int id = 1; id <= 2; id++) {
                    String pv = one(c, "SELECT v::text FROM " + p + " WHERE id = " + id);
                    String dv = one(c, "SELECT decrypt(v)::text FROM " + e + " WHERE id = " + id);
                    if (pv == null || !pv.equals(dv)) fail(plain + " " + setter + " row " + id + ": plain " + pv + ", decrypted " + dv);
                    checks++;
                }
                String env = one(c, "SELECT v FROM " + e + " WHERE id = 1");
                if (env == null || !env.startsWith("$cc$")) fail(plain + " " + setter + ": read as an envelope, got " + env);
                checks++;
            }
        }
        System.out.println("JDBC: ok (" + cases.length + " setters)");
        System.out.println("java drivers: " + checks + " checks passed");
    }

    static String one(Connection c, String sql) throws SQLException {
        try (Statement s = c.createStatement(); ResultSet r = s.executeQuery(sql)) {
            r.next();
            return r.getString(1);
        }
    }
}
