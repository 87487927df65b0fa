import Foundation
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// `logpool map`, `export`, `import` and `discard`, and raw images that qemu-img made or
/// reads (issue 10, "data in and out").
@Suite("logpool map, export, import, discard")
struct DataCommandTests {
    static func which(_ tool: String) -> String? {
        for dir in (ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin").split(separator: ":") {
            let path = "\(dir)/\(tool)"
            if FileManager.default.isExecutableFile(atPath: path) { return path }
        }
        return nil
    }

    /// A pool with volume `disk` (16 MiB): data at 0 (8 KiB), 5 MiB (64 KiB) and the last block.
    static func pool() throws -> (pool: String, data: [(Int, Data)]) {
        let pool = temporaryPath("p.pool")
        #expect(try CLI.run(["init", pool, "--size", "64M"]).status == 0)
        #expect(try CLI.run(["create", pool, "disk", "--size", "16M"]).status == 0)
        var data: [(Int, Data)] = []
        for (offset, count) in [(0, 8192), (5 << 20, 65536), ((16 << 20) - 4096, 4096)] {
            let bytes = Data((0..<count).map { UInt8(truncatingIfNeeded: ($0 &* 131 &+ offset >> 12) | 1) })
            #expect(try CLI.run(["write", pool, "disk", "--offset", String(offset)], stdin: bytes).status == 0)
            data.append((offset, bytes))
        }
        return (pool, data)
    }

    @Test("map lists data and holes as qemu-img map does; discard makes a hole")
    func mapAndDiscard() throws {
        let (pool, _) = try Self.pool()
        let text = try CLI.run(["map", pool, "disk"])
        #expect(text.status == 0)
        let rows = text.text.split(separator: "\n").dropFirst().map { $0.split(separator: " ").map(String.init) }
        #expect(rows == [["0", "8192", "data"], ["8192", "5234688", "hole"], ["5242880", "65536", "data"],
                         ["5308416", "11464704", "hole"], ["16773120", "4096", "data"]])
        #expect(try CLI.run(["discard", pool, "disk", "--offset", "5M", "--length", "64K"]).status == 0)
        let json = try CLI.run(["map", pool, "disk", "--json"])
        let entries = try JSONSerialization.jsonObject(with: json.stdout) as? [[String: Any]]
        #expect(entries?.count == 3)
        #expect(entries?[1]["start"] as? Int == 8192)
        #expect(entries?[1]["length"] as? Int == (16 << 20) - 8192 - 4096)
        #expect(entries?[1]["data"] as? Bool == false)
        // Errors: unknown volume, a discard past the end.
        #expect(try CLI.run(["map", pool, "nope"]).status == 1)
        #expect(try CLI.run(["discard", pool, "disk", "--offset", "16M", "--length", "4K"]).status == 1)
    }

    @Test("export to a file is sparse and byte-exact; to stdout it streams zeros; import round-trips")
    func exportImport() throws {
        let (pool, data) = try Self.pool()
        let image = temporaryPath("disk.raw")
        let exported = try CLI.run(["export", pool, "disk", image])
        #expect(exported.status == 0, "\(exported.stderr)")
        #expect(exported.stderr.isEmpty, "no progress when stderr is not a terminal: \(exported.stderr)")
        let bytes = try Data(contentsOf: URL(fileURLWithPath: image))
        #expect(bytes.count == 16 << 20)
        for (offset, chunk) in data { #expect(bytes[offset..<offset + chunk.count] == chunk) }
        var info = stat()
        #expect(stat(image, &info) == 0)
        #expect(info.st_blocks * 512 <= 8192 + 65536 + 4096 + 65536, "sparse: \(info.st_blocks * 512) bytes allocated")
        let streamed = try CLI.run(["export", pool, "disk", "-"])
        #expect(streamed.status == 0 && streamed.stdout == bytes)

        // Import from the file and from stdin (size required there); both read back equal.
        #expect(try CLI.run(["import", pool, image, "copy"]).status == 0)
        #expect(try CLI.run(["read", pool, "copy"]).stdout == bytes)
        #expect(try CLI.run(["map", pool, "copy"]).text == (try CLI.run(["map", pool, "disk"]).text))
        #expect(try CLI.run(["import", pool, "-", "piped"], stdin: bytes).status == 64)
        #expect(try CLI.run(["import", pool, "-", "piped", "--size", "16M"], stdin: bytes).status == 0)
        #expect(try CLI.run(["read", pool, "piped"]).stdout == bytes)
        // A name that exists, a missing file, a size below the file's: refused, nothing created.
        #expect(try CLI.run(["import", pool, image, "copy"]).status == 1)
        #expect(try CLI.run(["import", pool, image + ".missing", "other"]).status == 1)
        #expect(try CLI.run(["import", pool, image, "small", "--size", "1M"]).status == 64)
        #expect(!(try CLI.run(["list", pool]).text.contains("small")))
        // Export onto the pool file itself is refused.
        #expect(try CLI.run(["export", pool, "disk", pool]).status == 1)
        #expect(try CLI.run(["info", pool]).status == 0)
    }

    @Test("qemu-img: an exported image compares equal; qemu-img convert output imports identically")
    func qemuImg() throws {
        guard let qemu = Self.which("qemu-img") else {
            print("SKIPPED: qemu-img not found (Debian package qemu-utils; .ci/run installs it)")
            return
        }
        let (pool, _) = try Self.pool()
        let image = temporaryPath("disk.raw")
        #expect(try CLI.run(["export", pool, "disk", image]).status == 0)
        // qemu-img converts our raw image to qcow2 and back; the result imports to the same volume.
        let qcow = temporaryPath("disk.qcow2"), back = temporaryPath("back.raw")
        #expect(try CLI.run(["convert", "-f", "raw", "-O", "qcow2", image, qcow], binary: qemu).status == 0)
        #expect(try CLI.run(["convert", "-f", "qcow2", "-O", "raw", qcow, back], binary: qemu).status == 0)
        let compared = try CLI.run(["compare", "-f", "raw", "-F", "raw", image, back], binary: qemu)
        #expect(compared.status == 0, "\(compared.text) \(compared.stderr)")
        #expect(try CLI.run(["import", pool, back, "back"]).status == 0)
        #expect(try CLI.run(["map", pool, "back"]).text == (try CLI.run(["map", pool, "disk"]).text))
        let again = temporaryPath("again.raw")
        #expect(try CLI.run(["export", pool, "back", again]).status == 0)
        #expect(try Data(contentsOf: URL(fileURLWithPath: again)) == (try Data(contentsOf: URL(fileURLWithPath: image))))
        // qemu-img map of our export agrees with logpool map about where the data is.
        let map = try CLI.run(["map", "-f", "raw", "--output=json", image], binary: qemu)
        #expect(map.status == 0)
        let entries = (try JSONSerialization.jsonObject(with: map.stdout) as? [[String: Any]]) ?? []
        let dataRanges = entries.filter { $0["data"] as? Bool == true }.map { ($0["start"] as? Int ?? -1, $0["length"] as? Int ?? -1) }
        #expect(dataRanges.map(\.0) == [0, 5 << 20, (16 << 20) - 4096], "\(dataRanges)")
    }
}
