import ArgumentParser
import Foundation
import LogPool
import LogPoolCLIKit
#if canImport(Glibc)
import Glibc
#endif

/// A byte count on the command line, as qemu-img, LVM and zfs users type it: plain
/// bytes, or a number (decimals allowed: `1.5G`) with a suffix K, M, G, T, P or E, alone
/// or followed by `B` or `iB` (`1G`, `1GB`, `1GiB`). Every suffix is a power of 1024,
/// `GB` included, as in qemu-img and LVM. The result must be a whole number of bytes.
struct ByteSize: Sendable, CustomStringConvertible {
    var bytes: UInt64

    init(_ bytes: UInt64) { self.bytes = bytes }

    /// The `transform` of every size option: a clear message for each bad shape.
    static func argument(_ text: String) throws -> ByteSize {
        switch parse(text) {
        case .success(let value): return ByteSize(value)
        case .failure(let problem): throw ValidationError(problem.message)
        }
    }

    struct Problem: Error { var message: String }

    static func parse(_ text: String) -> Result<UInt64, Problem> {
        var body = Substring(text.trimmingCharacters(in: .whitespaces))
        guard !body.isEmpty else { return .failure(Problem(message: "empty")) }
        if body.hasPrefix("-") { return .failure(Problem(message: "negative size")) }
        if body.hasPrefix("+") { body = body.dropFirst() }
        // Suffix: [KMGTPE] then optional "B" or "iB" (any case), or a lone "B".
        let shifts: [Character: UInt64] = ["K": 10, "M": 20, "G": 30, "T": 40, "P": 50, "E": 60]
        var shift: UInt64 = 0
        let upper = body.uppercased()
        var suffixLength = 0
        for (ending, extra) in [("IB", 2), ("B", 1), ("", 0)] {
            guard upper.hasSuffix(ending), upper.count > ending.count else { continue }
            let unitIndex = upper.index(upper.endIndex, offsetBy: -(ending.count + 1))
            if let s = shifts[upper[unitIndex]] {
                shift = s
                suffixLength = extra + 1
                break
            }
            if ending == "B" {
                suffixLength = 1  // "512B": bytes
                break
            }
        }
        let number = body.dropLast(suffixLength)
        let parts = number.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count <= 2, !number.isEmpty, number != ".",
              parts.allSatisfy({ $0.allSatisfy { $0.isASCII && $0.isNumber } })
        else {
            return .failure(Problem(message: "expected a number with an optional suffix K, M, G, T, P or E (powers of 1024), e.g. 4096, 64K, 1.5G, 1GiB"))
        }
        let whole = parts[0].isEmpty ? Substring("0") : parts[0]
        let fraction = parts.count == 2 ? parts[1] : ""
        guard let integer = UInt64(whole) else { return .failure(Problem(message: "too large")) }
        let (scaled, overflow) = integer.multipliedReportingOverflow(by: 1 << shift)
        guard !overflow else { return .failure(Problem(message: "too large")) }
        guard !fraction.isEmpty else { return .success(scaled) }
        // The fraction times 2^shift must be a whole number of bytes: exact arithmetic on
        // at most 18 digits (a longer fraction is refused).
        guard fraction.count <= 18, let digits = UInt64(fraction) else { return .failure(Problem(message: "too many decimals")) }
        var denominator: UInt64 = 1
        for _ in 0..<fraction.count { denominator *= 10 }
        let product = digits.multipliedFullWidth(by: 1 << shift)
        let (quotient, remainder) = denominator.dividingFullWidth(product)
        guard remainder == 0 else {
            return .failure(Problem(message: "not a whole number of bytes"))
        }
        let (total, overflow2) = scaled.addingReportingOverflow(quotient)
        return overflow2 ? .failure(Problem(message: "too large")) : .success(total)
    }

    /// As help shows a default: the largest exact suffix.
    var description: String {
        for (suffix, shift) in [("E", 60), ("P", 50), ("T", 40), ("G", 30), ("M", 20), ("K", 10)] as [(String, UInt64)]
        where bytes >= (1 << shift) && bytes % (1 << shift) == 0 {
            return "\(bytes >> shift)\(suffix)"
        }
        return "\(bytes)"
    }
}

/// `--compression` on the command line (the library's `CompressionMode` is stored as a
/// number; help shows these names).
enum CompressionArgument: String, ExpressibleByArgument, CaseIterable, Sendable {
    case lz4
    case none

    var mode: CompressionMode { self == .lz4 ? .lz4 : .none }
}

/// `list --json` rows: `origin` is always present, null when there is none.
struct VolumeRow: Encodable {
    var info: VolumeInfo

    enum Keys: String, CodingKey {
        case name, kind, sizeBytes, mappedBytes, allocatedBytes, exclusiveBytes, origin, createdTime
    }

    func encode(to encoder: Encoder) throws {
        var c = encoder.container(keyedBy: Keys.self)
        try c.encode(info.name, forKey: .name)
        try c.encode(info.kind, forKey: .kind)
        try c.encode(info.sizeBytes, forKey: .sizeBytes)
        try c.encode(info.mappedBytes, forKey: .mappedBytes)
        try c.encode(info.allocatedBytes, forKey: .allocatedBytes)
        try c.encode(info.exclusiveBytes, forKey: .exclusiveBytes)
        try c.encode(info.origin, forKey: .origin)
        try c.encode(info.createdTime, forKey: .createdTime)
    }
}

func formatBytes(_ bytes: UInt64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"]
    var value = Double(bytes)
    var unit = 0
    while value >= 1024 && unit < units.count - 1 {
        value /= 1024
        unit += 1
    }
    return unit == 0 ? "\(bytes) B" : String(format: "%.1f %@", value, units[unit])
}

func printTable(_ rows: [[String]]) throws {
    guard let first = rows.first else { return }
    var widths = [Int](repeating: 0, count: first.count)
    for row in rows { for (i, cell) in row.enumerated() { widths[i] = max(widths[i], cell.count) } }
    var text = ""
    for row in rows {
        let line = row.enumerated().map { i, cell in
            i == 0 ? cell.padding(toLength: widths[i], withPad: " ", startingAt: 0)
                : String(repeating: " ", count: widths[i] - cell.count) + cell
        }.joined(separator: "  ")
        text += line + "\n"
    }
    try out(text, terminator: "")
}

/// Opens `path` read-write, runs `body`, and closes (checkpointing) the pool, also when
/// `body` fails, so a refused command leaves the pool cleanly closed.
func withWritablePool(_ path: String, _ body: (Pool) throws -> Void) throws {
    if let served = ServedPool.current {
        // A command sent to `logpool serve`'s control socket: the server's open pool,
        // synced (not closed) after, so the change is durable when the client returns.
        try body(served)
        try served.sync()
        return
    }
    let pool: Pool
    do {
        pool = try Pool.open(at: path)
    } catch PoolError.inUse(let why) {
        try ControlClient.forward(poolPath: path, refusal: why)
    }
    do {
        try body(pool)
    } catch {
        try? pool.close()
        throw error
    }
    try pool.close()
}

func printVolumeTable(_ rows: [VolumeInfo]) throws {
    var table = [["NAME", "KIND", "SIZE", "ALLOCATED", "EXCLUSIVE", "ORIGIN"]]
    for r in rows {
        table.append([oneLine(r.name), r.kind, formatBytes(r.sizeBytes), formatBytes(r.allocatedBytes), formatBytes(r.exclusiveBytes), r.origin.map(oneLine) ?? "-"])
    }
    try printTable(table)
}

/// True when `info` is the pool file at `pool` itself: writing from it would copy the
/// pool into a volume, reading into it would overwrite the pool.
func isPoolFile(_ pool: String, _ info: stat) -> Bool {
    var poolInfo = stat()
    return statPath(pool, &poolInfo) == 0 && poolInfo.st_dev == info.st_dev && poolInfo.st_ino == info.st_ino
}
