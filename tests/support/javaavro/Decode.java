// Decodes one callstream record the way a consumer in any language would: by the Avro
// single-object encoding spec and the .avsc files alone, with nothing from callstream.
//
//   java -jar decode.jar RECORD_FILE SCHEMA_DIR
//
// RECORD_FILE holds the raw value of one Kafka record (kcat -f '%s'); SCHEMA_DIR is
// schemas/avro. Prints the record as JSON on stdout, and which schema file wrote it on
// stderr. Exit codes: 2 not single-object encoded, 3 no schema with that fingerprint.

import java.io.FileDescriptor;
import java.io.FileOutputStream;
import java.io.IOException;
import java.io.PrintStream;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.charset.StandardCharsets;
import java.nio.file.DirectoryStream;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.HexFormat;

import org.apache.avro.Schema;
import org.apache.avro.SchemaNormalization;
import org.apache.avro.generic.GenericData;
import org.apache.avro.generic.GenericDatumReader;
import org.apache.avro.generic.GenericRecord;
import org.apache.avro.io.BinaryDecoder;
import org.apache.avro.io.DecoderFactory;

public final class Decode {
    private static final int HEADER = 10; // C3 01 + 8-byte fingerprint

    public static void main(String[] args) throws IOException {
        if (args.length != 2) {
            System.err.println("usage: java -jar decode.jar RECORD_FILE SCHEMA_DIR");
            System.exit(64);
        }
        byte[] data = Files.readAllBytes(Path.of(args[0]));
        if (data.length < HEADER || (data[0] & 0xff) != 0xC3 || (data[1] & 0xff) != 0x01) {
            System.err.println("not Avro single-object encoding (no C3 01 marker)");
            System.exit(2);
        }
        // The spec writes the CRC-64-AVRO fingerprint little-endian.
        long fingerprint = ByteBuffer.wrap(data, 2, 8).order(ByteOrder.LITTLE_ENDIAN).getLong();

        Schema writer = null;
        Path writerFile = null;
        try (DirectoryStream<Path> files = Files.newDirectoryStream(Path.of(args[1]), "*.avsc")) {
            for (Path file : files) {
                // A fresh parser per file: each .avsc is self-contained, and one parser
                // would refuse the second version of the same named record.
                Schema candidate = new Schema.Parser().parse(file.toFile());
                if (SchemaNormalization.parsingFingerprint64(candidate) == fingerprint) {
                    writer = candidate;
                    writerFile = file;
                    break;
                }
            }
        }
        if (writer == null) {
            System.err.printf(
                "no schema in %s has fingerprint %s%n",
                args[1],
                HexFormat.of().formatHex(data, 2, HEADER));
            System.exit(3);
        }

        BinaryDecoder body =
            DecoderFactory.get().binaryDecoder(data, HEADER, data.length - HEADER, null);
        GenericRecord record = new GenericDatumReader<GenericRecord>(writer).read(null, body);
        System.err.println("schema: " + writerFile.getFileName());
        // UTF-8 whatever the locale says: transcripts are not ASCII, and Java 17 would
        // otherwise print them in the platform charset, '?' for every accent under C/POSIX.
        PrintStream stdout =
            new PrintStream(new FileOutputStream(FileDescriptor.out), true, StandardCharsets.UTF_8);
        // GenericData renders records as JSON: unions as their value, enums as symbols.
        stdout.println(GenericData.get().toString(record));
    }
}
