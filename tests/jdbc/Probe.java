import java.sql.*;
import java.util.Properties;

/** Drives one JDBC session through Odissey and prints what it saw, one "key=value" a line.
 *  Usage: java -cp postgresql.jar Probe.java URL USER PASSWORD PREPARE_THRESHOLD */
public class Probe {
    public static void main(String[] args) throws Exception {
        Properties props = new Properties();
        props.setProperty("user", args[1]);
        props.setProperty("password", args[2]);
        props.setProperty("sslmode", "disable");
        props.setProperty("prepareThreshold", args[3]);
        try (Connection conn = DriverManager.getConnection(args[0], props)) {
            int sum = 0;
            try (PreparedStatement ps = conn.prepareStatement("select ?::int * 2")) {
                for (int i = 0; i < 10; i++) {  // past prepareThreshold: a named server statement
                    ps.setInt(1, i);
                    try (ResultSet rs = ps.executeQuery()) { rs.next(); sum += rs.getInt(1); }
                }
            }
            System.out.println("prepared_sum=" + sum);
            try (Statement st = conn.createStatement();
                 ResultSet rs = st.executeQuery("select count(*) from pg_prepared_statements")) {
                rs.next();
                System.out.println("server_statements=" + rs.getInt(1));
            }

            conn.setAutoCommit(false);
            try (Statement st = conn.createStatement()) {
                st.execute("create temp table jdbc_probe (x int) on commit drop");
            }
            try (PreparedStatement ins = conn.prepareStatement("insert into jdbc_probe values (?)")) {
                for (int i = 1; i <= 100; i++) { ins.setInt(1, i); ins.addBatch(); }
                System.out.println("batch=" + ins.executeBatch().length);
            }
            try (Statement st = conn.createStatement(); ResultSet rs = st.executeQuery("select sum(x) from jdbc_probe")) {
                rs.next();
                System.out.println("batch_sum=" + rs.getInt(1));
            }
            conn.commit();

            try (Statement st = conn.createStatement()) {
                st.execute("select 1/0");
            } catch (SQLException e) {
                System.out.println("error=" + e.getSQLState());
                conn.rollback();
            }
            conn.setAutoCommit(true);
            try (Statement st = conn.createStatement(); ResultSet rs = st.executeQuery("select 'still here'")) {
                rs.next();
                System.out.println("after=" + rs.getString(1));
            }
        }
    }
}
