// Cooperative-matrix prelude of `mm_coop` for adapters with 16x16x16 matrices of f16
// products summed in f32 (wgpu's EXPERIMENTAL_COOPERATIVE_MATRIX): the enables, which
// must lead the module, so this prelude goes first, and the three matrix types with
// their size.

enable f16;
enable wgpu_cooperative_matrix;

// Rows and columns of every matrix, and the k of one multiply-add.
const CM: u32 = 16u;

// A: CM weight rows x CM values of k; B: CM values of k x CM tokens; C: the sums.
alias CoopW = coop_mat16x16<f16, A>;
alias CoopX = coop_mat16x16<f16, B>;
alias CoopSum = coop_mat16x16<f32, C>;
